# One image for every modkit component; the command picks which one runs.
#
#   docker build -t modkit .
#   docker run --rm -p 127.0.0.1:8001:8001 modkit          # all six in one container (start_all.py)
#   docker run --rm modkit python -m modkit.scheduler --help  # one component (see deploy/compose.yaml)
#
# BASE_IMAGE is any Debian-like image with python3 (3.10 or newer) and its venv module. Where no
# registry can be pulled, build one from Debian's packages and import it (docs/scaling.md):
#
#   debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm root/
#   tar -C root -c . | podman import - localhost/debian-python:bookworm
#   podman build --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t modkit .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# A virtual environment, so that `python` and `pip` mean the same on either kind of base.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# CPU torch first, from PyTorch's CPU index: a plain `pip install torch` would pull a CUDA build
# of several GB. Without that index, point pip at a folder of wheels instead, e.g.
#   --volume /opt/wheels:/wheels:ro --build-arg TORCH_PIP_ARGS="--find-links /wheels"
# (a local version, 2.13.0+cpu, ranks above PyPI's 2.13.0, so pip takes the wheel from the folder).
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
RUN pip install --no-cache-dir $TORCH_PIP_ARGS torch==2.13.0

# Installed editable: the embedded tiny model is found beside the package, in data/models.
WORKDIR /opt/modkit
COPY pyproject.toml README.md ./
COPY modkit modkit
RUN pip install --no-cache-dir -e .
COPY data data
COPY scripts scripts
COPY deploy deploy

# Not root. /run/modkit is where deploy/compose.yaml's `keys` service writes the CURVE keys
# and the pipeline's config; a fresh volume mounted there takes this owner from the image.
RUN useradd --uid 10001 --create-home modkit \
    && mkdir -p /run/modkit \
    && chown modkit:modkit /run/modkit
USER modkit

EXPOSE 8001
# All six components in one container. The API must listen on every interface of the
# container to be published; the other components talk over ipc:// files inside it.
CMD ["python", "scripts/start_all.py", "--host", "0.0.0.0", "--allow-remote"]
