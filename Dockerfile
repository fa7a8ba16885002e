# syntax=docker/dockerfile:1
# Two images from one file. No Docker engine runs on the development machines: build
# them in CI or on a workstation.
#
#   docker build --target bot     -t ctbot:0.1.0 .           # `ctbot serve`: no torch, no faiss
#   docker build --target trainer -t ctbot-trainer:0.1.0 .   # the pipeline's steps, `ctbot serve-model`
#   docker build --target trainer --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#       -t ctbot-trainer:0.1.0-cu126 .                       # CUDA torch for GPU nodes
#
# The trainer image is what the pipeline's components run in (config key `image`,
# CT_IMAGE). Dependencies are installed from pyproject.toml before the sources are
# copied, so a source edit rebuilds only the last layers.

# An exact tag (add @sha256:<digest> from your registry to pin it byte for byte).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/ctbot
RUN groupadd --gid 10001 ctbot \
 && useradd --uid 10001 --gid 10001 --home-dir /home/ctbot --create-home --shell /usr/sbin/nologin ctbot \
 && python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
# requirements of the [project] table and of one optional extra, read from pyproject.toml
RUN printf '%s\n' \
      'import sys, tomllib' \
      'p = tomllib.load(open("pyproject.toml", "rb"))["project"]' \
      'deps = list(p["dependencies"]) + [d for e in sys.argv[1:] for d in p["optional-dependencies"][e]]' \
      'print("\n".join(d for d in deps if not d.startswith("torch")))' > /usr/local/bin/ctbot-requirements.py

# ---- bot: Slack bot and scheduler --------------------------------------------------------
FROM base AS bot-deps
RUN python /usr/local/bin/ctbot-requirements.py > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

FROM bot-deps AS bot
COPY ctbot ctbot
COPY core core
COPY bot bot
COPY scheduler scheduler
COPY pipelines pipelines
COPY steps steps
RUN pip install . && rm -rf build
USER 10001:10001
EXPOSE 3000
ENTRYPOINT ["ctbot"]
CMD ["serve"]

# ---- trainer: pipeline steps and the model server ----------------------------------------
FROM base AS trainer-deps
# CPU wheels by default (a plain `pip install torch` pulls the multi-GB CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION} \
 && python /usr/local/bin/ctbot-requirements.py train > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

FROM trainer-deps AS trainer
COPY ctbot ctbot
COPY core core
COPY pipelines pipelines
COPY steps steps
COPY serving serving
# KFP's v2 launcher puts artifacts under /minio, /s3 and /gcs, paths a non-root user
# cannot create (kubeflow/pipelines#5673, #10397): they exist and belong to it here.
RUN pip install . && rm -rf build \
 && mkdir -p /minio /s3 /gcs && chown 10001:10001 /minio /s3 /gcs
USER 10001:10001
# KFP gives each step its own command (python3 -m kfp.dsl.executor_main ...); this is
# for running the image as the model server.
CMD ["ctbot", "serve-model"]
