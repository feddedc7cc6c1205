// EdgeMatrixConsensus
