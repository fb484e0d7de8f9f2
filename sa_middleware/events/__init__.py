"""Security events in: the OpenID Shared Signals (SSF 1.0) receiver, CAEP/RISC event mapping and poll delivery."""
