"""Template protection, envelope encryption, homomorphic matching and DP accounting."""
