// EdgeMatrixRouter
