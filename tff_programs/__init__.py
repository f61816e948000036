"""TensorFlow Federated computations and programs for FedMef."""
