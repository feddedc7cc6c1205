// EdgeMatrixNetwork
