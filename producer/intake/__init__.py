"""What comes in: the folder walk, the submit of a batch, OpenAI Batch files."""
