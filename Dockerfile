# One image for every infermesh service; the arguments pick the service:
#
#   docker build -t infermesh:0.1.0 .
#   docker run infermesh:0.1.0 services.router       # python -m services.router
#   docker run infermesh:0.1.0 control.api           # the control API
#
# The CUDA build for GPU workers differs only in the torch wheel's index:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     -t infermesh:0.1.0-cuda .
#
# Kubernetes manifests: deploy/k8s/ (docs/KUBERNETES.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, in their own layers: they change far less often than the code.
COPY pyproject.toml ./
# torch by itself, from the index that serves the wanted build (CPU unless told otherwise),
# pinned as scripts/bootstrap.sh pins it; the other dependencies then find it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY services ./services
COPY control ./control
COPY deploy ./deploy
COPY cli ./cli
COPY bench ./bench
# The code itself, into the venv (bytecode compiled here: the root filesystem is read-only
# at run time).
RUN pip install --no-deps . && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE}
# A fixed numeric uid, so Kubernetes can verify runAsNonRoot (deploy/k8s runs as 10001).
RUN groupadd --system --gid 10001 infermesh \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/infermesh --create-home \
        --shell /usr/sbin/nologin infermesh
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/infermesh
USER 10001:10001
# gateway REST and gRPC, control API, registry, router, batcher, worker (deploy/k8s ports).
EXPOSE 8000 8001 8100 8200 8300 8400 8500
ENTRYPOINT ["python", "-m"]
CMD ["services.gateway"]
