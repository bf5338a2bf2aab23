# EfficientNet for PyTorch on an NVIDIA PyTorch container (any recent <yy.mm>-py3 tag works):
#   docker build -t efficientnet .
#   docker run --gpus all --ipc=host -v /data/imagenet:/imagenet -v "$PWD/ws":/ws -it efficientnet \
#       bash efficientnet/training/AMP/DGXA100_efficientnet-b0_AMP.sh /ws
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${FROM_IMAGE_NAME}

WORKDIR /workspace/efficientnet

# The container's own CUDA build of torch/torchvision is kept; the torch pins of requirements.txt are
# the registry pair for installs outside a container. Everything else is installed as pinned.
COPY requirements.txt .
RUN grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
