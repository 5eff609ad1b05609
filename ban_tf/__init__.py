"""ban_tf: Born-Again Networks (Furlanello et al., ICML 2018) in TensorFlow/Keras."""
