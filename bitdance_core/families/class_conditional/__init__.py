"""Class-conditional (ImageNet 256x256) BitDance models: ``imagenet_gen``'s BitDance-B/L/H, 1x / 4x / 16x."""
