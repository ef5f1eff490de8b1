from cartiq.cli import main

main()
