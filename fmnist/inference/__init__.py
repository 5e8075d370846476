"""Using a trained model: load any checkpoint, evaluate it, predict on image files, export it to ONNX.

`loading` finds and rebuilds the model (a `.ckpt`, a run directory or a sweep directory); `evaluate`,
`predict` and `export` are the logic of the entry points of the same names; `images` turns photos
into Fashion-MNIST-style 28x28 inputs; `config` holds the three commands' configs (read without torch);
`tricks` scores a run's EMA and TTA on validation (`python -m fmnist.results tricks`).
"""
