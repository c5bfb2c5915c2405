"""The HTTP server of an export folder (`lepton serve`)."""
