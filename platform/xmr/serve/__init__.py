"""Ray Serve retrieval endpoint: galleries encoded once, exact or FAISS search, batched
queries, validated HTTP inputs. ``xmr serve`` and ``serving/`` start it."""
