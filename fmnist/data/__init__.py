"""Data: Kaggle-format CSV parsing, obtaining the data, the LightningDataModule, in-memory batches, augmentation."""
