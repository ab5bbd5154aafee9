"""Running networks: loading from a card, device and precision, compiled CPU graphs (OpenVINO, TorchScript), MONAI import."""
