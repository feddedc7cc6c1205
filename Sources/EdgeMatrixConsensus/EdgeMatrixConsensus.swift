// EdgeMatrixConsensus: Tendermint consensus (Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus",
// 2018) as a pure, deterministic state machine, generic over opaque block values (bytes).
//
// How a validator process drives it (see `ConsensusEngine`):
//
//   let wal = try FileWAL(path: dataDir + "/consensus.wal")
//   var engine = ConsensusEngine(configuration: config, validators: setForHeight, signer: nodeKey,
//                                walRecords: try wal.replay())
//   feed .validatorUpdates(...) still pending, then .start(height: lastCommitted + 1)
//   for every event (message from a peer, fired timer, application answer, synced block):
//       for action in try engine.handle(event, wal: wal) { carry it out, in order }
//
// and periodically re-send `engine.gossipMessages` to peers. When a peer's message is for a higher height,
// fetch committed blocks with their certificates from it and feed them as `.syncedBlock`, in height order.
