"""FedMef in plain TensorFlow/Keras: masks, sparse layers, NSConv, SAP, models, memory model."""
