"""Image decoding and resizing: the one JPEG decoder, torchvision-exact resizes, bicubic weights."""
