// EdgeMatrixClient
