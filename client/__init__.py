"""The site agent: local pipeline, gallery SDK and the Flower client app."""
