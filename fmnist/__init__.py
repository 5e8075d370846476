"""fmnist: Fashion-MNIST CNN studies with PyTorch Lightning and Hydra."""

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIDE = 28  # pixels: a Fashion-MNIST image is IMAGE_SIDE x IMAGE_SIDE greyscale
