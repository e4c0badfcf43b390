"""dfl_tf: deep feature learning for histopathology on TensorFlow/Keras."""
__version__ = "0.1.0"
