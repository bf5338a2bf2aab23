"""EfficientNet training and inference suite, faithful to NVIDIA's ConvNets for PyTorch."""
