"""Clients: the sync (selectors) and async (asyncio) drivers, and target resolution."""
