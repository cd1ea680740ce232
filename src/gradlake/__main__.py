from gradlake.cli import main

main()
