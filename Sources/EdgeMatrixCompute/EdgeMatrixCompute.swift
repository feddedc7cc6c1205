// EdgeMatrixCompute
