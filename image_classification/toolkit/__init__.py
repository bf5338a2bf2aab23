"""Techniques around the training loop, each standalone: fine-tuning (layer decay, freezing, head), knowledge
distillation, stochastic weight averaging and checkpoint averaging, test-time augmentation, progressive training
stages, and quantization (calibration, QAT, INT8 export). Those that change a training run are training features
(image_classification/features.py); none imports the train package."""
