# cartiq: knee MRI cartilage quantification, GPU image (CUDA PyTorch base).
#
#   docker build -t cartiq .
#   docker run --rm --gpus all -v /data:/data cartiq batch /data/manifest.csv -o /data/out
#
# CPU-only image (no CUDA libraries; torch's CPU wheel is installed instead):
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -t cartiq:cpu .
#
# The base image's Python must satisfy pyproject's requires-python (>=3.11): the
# pytorch/pytorch 2.5.1 images ship Python 3.11.  torch is pinned to the base image's own
# build (a constraints file), so pip never swaps in another multi-GB CUDA wheel.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CPU_VERSION=2.5.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# torch: the base image's build, or (CPU base without torch) the CPU wheel
RUN python -c "import torch" 2>/dev/null \
    || pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_CPU_VERSION}" \
 && python -c "import sys; assert sys.version_info >= (3, 11), sys.version" \
 && python -c "from importlib.metadata import version; \
print('torch==' + version('torch').split('+')[0])" > /tmp/constraints.txt

WORKDIR /opt/cartiq

# dependency layer: cached until pyproject.toml changes.  The optional extra nnunet
# (nnU-Net v2 models, huggingface_hub for `cartiq models fetch`) is included; the repo's
# constraints apply except its torch pin (the base image's torch stays).
COPY pyproject.toml README.md LICENSE ./
COPY scripts/constraints.txt /tmp/repo-constraints.txt
RUN grep -v '^torch==' /tmp/repo-constraints.txt >> /tmp/constraints.txt \
 && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
reqs = d['project']['dependencies'] + d['project']['optional-dependencies']['nnunet']; \
open('/tmp/requirements.txt', 'w').write('\n'.join(reqs) + '\n')" \
 && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

# the package, its configs and the default model weights: built into a wheel (configs,
# label maps, the model registry and the default model ship inside it), then installed as a
# user would; the source tree is removed so nothing can depend on it
COPY pipeline/ pipeline/
COPY configs/ configs/
COPY models/ models/
COPY sample_data/ sample_data/
RUN pip wheel --no-deps -w /tmp/wheels . \
 && pip install -c /tmp/constraints.txt --no-deps /tmp/wheels/cartiq-*.whl \
 && rm -rf /tmp/wheels /opt/cartiq \
 && cd / && python -c "import torch, cartiq; print('cartiq', cartiq.__version__, 'torch', torch.__version__)" \
 && cartiq --help > /dev/null

# non-root user; results are written to mounted volumes (e.g. /data)
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin cartiq \
 && mkdir -p /data && chown cartiq:cartiq /data
USER cartiq
ENV HOME=/home/cartiq \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /data

ENTRYPOINT ["cartiq"]
CMD ["--help"]
