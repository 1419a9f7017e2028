"""What evaluation reads: benchmark sets (lists, positives, registry) and ordered evaluation batches."""
