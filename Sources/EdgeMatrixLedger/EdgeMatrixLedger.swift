// EdgeMatrixLedger
