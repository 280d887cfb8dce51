"""GPU backends: SyncTensor (stream owner), the image backends, TorchScriptTensor, TensorrtTensor.

Nothing here imports cuda-python, torch or TensorRT at import time; each backend loads
what it needs when an instance initialises, and on a machine without a GPU that init
fails with a typed error saying so (ModelUnavailableError "no CUDA device: ...").
"""
