"""Site side of federated training: data store, DP-SGD fine-tuning, Flower ClientApp."""
