"""megafusion.objectives"""
