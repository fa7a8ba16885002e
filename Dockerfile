# syntax=docker/dockerfile:1
# Two images from one file, both installed from hashed lock files (requirements/*.txt,
# refreshed by `./dev.sh lock`), so a rebuild installs the same bytes.
#
#   docker build --target bot     -t ctbot:0.1.0 .           # `ctbot serve`: no torch, faiss, matplotlib, pillow
#   docker build --target trainer -t ctbot-trainer:0.1.0 .   # the pipeline's steps, `ctbot serve-model`
#
# On the development machines `./dev.sh images` builds both with podman from a Debian base
# made by mmdebstrap (no registry is reachable there), the machine's CA bundle and its local
# torch wheel directory mounted into the build (README, "Build and run the images").
#
# The trainer image is what the pipeline's components run in (config key `image`,
# CT_IMAGE). Dependencies are installed before the sources are copied, so a source edit
# rebuilds only the last layers. A CUDA trainer needs a lock compiled against a CUDA torch
# index (the lock pins torch's CPU wheel by hash).

# An exact tag (add @sha256:<digest> from your registry to pin it byte for byte). Any
# Debian-like image with python3 (>= 3.11) and its venv module will do: ENV below sets
# everything an imported root file system lacks.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/ctbot
RUN groupadd --gid 10001 ctbot \
 && useradd --uid 10001 --gid 10001 --home-dir /home/ctbot --create-home --shell /usr/sbin/nologin ctbot \
 && python3 -m venv /opt/venv
WORKDIR /app

# ---- bot: Slack bot and scheduler --------------------------------------------------------
FROM base AS bot-deps
COPY requirements/bot.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/bot.txt

FROM bot-deps AS bot
COPY pyproject.toml README.md ./
COPY ctbot ctbot
COPY core core
COPY bot bot
COPY scheduler scheduler
COPY pipelines pipelines
COPY steps steps
# setuptools comes from the lock: no unpinned build environment.
RUN pip install --no-deps --no-build-isolation . && rm -rf build
USER 10001:10001
EXPOSE 3000
ENTRYPOINT ["ctbot"]
CMD ["serve"]

# ---- trainer: pipeline steps and the model server ----------------------------------------
FROM base AS trainer-deps
# torch's CPU wheel is pinned by hash in the lock; it comes from this index (a plain
# PyPI torch is the multi-GB CUDA build) or, when the build passes PIP_FIND_LINKS and
# mounts a wheel directory there, from that directory (TORCH_INDEX= then skips the index).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
COPY requirements/trainer.txt requirements/
RUN pip install --require-hashes --no-deps ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
      -r requirements/trainer.txt

FROM trainer-deps AS trainer
COPY pyproject.toml README.md ./
COPY ctbot ctbot
COPY core core
COPY pipelines pipelines
COPY steps steps
COPY serving serving
# KFP's v2 launcher puts artifacts under /minio, /s3 and /gcs, paths a non-root user
# cannot create (kubeflow/pipelines#5673, #10397): they exist and belong to it here.
RUN pip install --no-deps --no-build-isolation . && rm -rf build \
 && mkdir -p /minio /s3 /gcs && chown 10001:10001 /minio /s3 /gcs
USER 10001:10001
EXPOSE 8080
# The manifests give only `args` (["serve-model", ...]): Kubernetes keeps this ENTRYPOINT.
# KFP gives each step its own command (python3 -m kfp.dsl.executor_main ...), which
# replaces it.
ENTRYPOINT ["ctbot"]
CMD ["serve-model"]
