// EdgeMatrixNode
