"""Export of trained FedMef models to TFLite with on-device training signatures."""
