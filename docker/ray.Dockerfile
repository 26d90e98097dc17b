# Ray image for the head and the workers: the data plane (ray_jobs/) and its requirements.
#   docker build -f docker/ray.Dockerfile -t emb-ray:cpu .
#   docker build -f docker/ray.Dockerfile --build-arg VARIANT=gpu -t emb-ray:cuda .
# The gpu variant starts from Ray's CUDA image; torch comes from the package index
# (set TORCH_INDEX_URL to a CPU-only torch index for a smaller cpu image).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
COPY --chown=ray:users requirements.txt constraints.txt /home/ray/embeddings/
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -c /home/ray/embeddings/constraints.txt \
        transformers tokenizers pyarrow fsspec s3fs pillow safetensors numpy
COPY --chown=ray:users ray_jobs /home/ray/embeddings/ray_jobs
ENV PYTHONPATH=/home/ray/embeddings HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
WORKDIR /home/ray/embeddings
USER ray
