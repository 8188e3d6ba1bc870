"""megafusion.model"""
