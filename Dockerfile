# One image for the bot and for the pipeline's components (KFP runs them with this
# image as base_image, so it carries the train extra; the bot never imports torch).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot bot
COPY core core
COPY pipelines pipelines
COPY scheduler scheduler
COPY steps steps
# Set TORCH_INDEX to a CPU-only wheel index for a much smaller image.
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir '.[train]'
USER 10001
ENTRYPOINT ["ctbot"]
CMD ["serve"]
