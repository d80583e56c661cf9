"""The Open Inference Protocol over gRPC: the interface (``grpc_predict_v2.proto``), its message classes
(``messages``), the call codec (``codec``) and the server (``server``), on ``FERRY_GRPC_PORT``."""
