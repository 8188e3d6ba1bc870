"""megafusion.checkpoint"""
