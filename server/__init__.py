"""The central service: gallery API, database, audit log and federated training."""
