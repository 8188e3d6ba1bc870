"""megafusion.data"""
