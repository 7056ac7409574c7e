"""Export: ONNX / torch.export graphs (``onnx``) and the transformers adapter (``hf``)."""
