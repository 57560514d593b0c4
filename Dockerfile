# sononode: one image for every role (listener, api, scheduler, cpu/gpu workers).
# The GPU worker runs the same image with `gpus: all`; torch falls back to the CPU
# where no GPU is visible. For a CUDA build of torch pass
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 (or a local mirror).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sononode
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY node ./node
COPY workers ./workers
COPY dicom_sr ./dicom_sr
COPY deploy/models ./deploy/models
RUN pip install --no-cache-dir ".[s3]"  \
    && useradd --system --uid 1000 --home /data sononode \
    && mkdir -p /data && chown sononode /data

USER sononode
ENV SONONODE_DATA_DIR=/data \
    PROMETHEUS_MULTIPROC_DIR=/data/metrics \
    SONONODE_MODEL_PACKS=/opt/sononode/deploy/models/sononode-us-sim
VOLUME ["/data"]
EXPOSE 11112 8000
ENTRYPOINT ["sononode"]
CMD ["up"]
