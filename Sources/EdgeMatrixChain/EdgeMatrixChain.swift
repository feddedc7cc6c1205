// The validator node: hosts consensus, the ledger, block storage, mempool, peers and the chain's HTTP API.
