"""Using a trained reward model: rm-score's row shapes (rows) and its sharded, resumable file scorer
(score), and rm-serve's model thread (batcher) and HTTP server (serve)."""
