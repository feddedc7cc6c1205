// EdgeMatrixStore
