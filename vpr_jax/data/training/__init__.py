"""The training set: GSV-Cities / GSV-XS folders -> place index, and the grain pipeline of P x K batches."""
